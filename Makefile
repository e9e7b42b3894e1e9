# Every target does its own set-up: `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PROTOS  = $(wildcard protos/dcgan/v1/*.proto protos/dcgan/oip/*.proto)
MNIST  ?= ../shared/datasets/mnist

.PHONY: setup proto test test-fast lint serve serve-cluster train-mnist train-ring bench clean api-check api-accept

setup: $(VENV)/.installed proto

$(VENV)/.installed: requirements.txt requirements-serve.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Generated code lands beside its .proto (package dcgan.v1) and is never edited or committed.
proto: $(VENV)/.installed $(PROTOS:.proto=_pb2.py)

protos/%_pb2.py: protos/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $<

# The API contract: buf lint (STANDARD) and buf breaking against the accepted API image.
api-check: setup
	cd protos && ../$(VENV)/bin/buf lint && ../$(VENV)/bin/buf breaking --against api-image.json

# Accept the current .proto as the API (after a deliberate, reviewed change).
api-accept: setup
	cd protos && ../$(VENV)/bin/buf build -o api-image.json

test: setup
	$(PY) -m pytest

# Everything but the tests marked slow (real server processes, torchrun, Envoy, long runs).
test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# It prints every port it listens on: gRPC (dcgan.v1, OIP), HTTP (OIP REST, /v1), metrics.
PORT ?= 50051
HTTP_PORT ?= 8080
serve: setup
	$(VENV)/bin/dcgan-serve --repository exported --port $(PORT) --http-port $(HTTP_PORT)

# REPLICAS dcgan-serve processes on free ports behind Envoy on ports 50051 and 8080 (no containers).
REPLICAS ?= 2
serve-cluster: setup
	$(VENV)/bin/dcgan-cluster --replicas $(REPLICAS) --port $(PORT) --http-port $(HTTP_PORT) -- --repository exported

train-mnist: setup
	$(VENV)/bin/dcgan-train --preset mnist --data-dir $(MNIST)

train-ring: setup
	$(VENV)/bin/dcgan-train --preset ring

bench: setup
	$(PY) bench/train_throughput.py --data-dir $(MNIST)
	$(PY) bench/serve_throughput.py --repository exported
	$(PY) bench/quality.py --data-dir $(MNIST) --epochs 5
	$(PY) bench/quality.py --data-dir $(MNIST) --conditional exported/mnist-cond/2/generator.onnx
	$(PY) bench/fd_over_seeds.py --data-dir $(MNIST) exported/mnist-dcgan/3/generator.onnx exported/mnist-cond/2/generator.onnx exported/toy-ring/1/generator.onnx
	$(PY) bench/latent_controls.py --data-dir $(MNIST) --model mnist-dcgan
	$(PY) bench/fairness.py --repository exported --model mnist-dcgan
	$(PY) bench/cluster_overhead.py --repository exported --model mnist-dcgan
	$(PY) bench/protocol_overhead.py --repository exported --model mnist-dcgan
	$(PY) bench/oip_vs_triton.py --repository exported --model mnist-dcgan
	$(PY) bench/playground.py --repository exported
	$(PY) bench/serve_vs_triton.py --repository exported --model mnist-dcgan
	$(PY) bench/loop_cost.py --repository exported --model mnist-dcgan
	$(PY) bench/drain_through_envoy.py --repository exported --model mnist-dcgan
	$(PY) bench/ddp_throughput.py --data-dir $(MNIST)
	$(PY) bench/step_time.py --data-dir $(MNIST) --profile

clean:
	rm -rf $(VENV) protos/dcgan/v1/*_pb2*.py* .pytest_cache
