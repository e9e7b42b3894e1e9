"""Build hook: the gRPC code (package dcgan.v1) is generated from protos/ whenever a wheel or sdist
install is built, so installs need no ``make proto`` and generated code is never committed.
Everything else about the package is declared in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_ROOT = Path("protos")


class BuildPyWithProtos(build_py):
    """build_py, then protoc (grpcio-tools, a build requirement) into the build folder."""

    def run(self) -> None:
        super().run()
        from grpc_tools import protoc

        out = Path(self.build_lib)
        for proto in sorted(PROTO_ROOT.glob("dcgan/**/*.proto")):
            args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
                    f"--grpc_python_out={out}", str(proto)]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {proto}")


setup(cmdclass={"build_py": BuildPyWithProtos})
