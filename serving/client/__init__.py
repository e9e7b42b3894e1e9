"""The client side: the Python library (``library``), ``dcgan-client`` (``cli``), batch jobs
(``jobs``) and the health probe for containers (``healthcheck``); no onnxruntime, no torch."""
