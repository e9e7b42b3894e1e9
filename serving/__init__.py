"""The inference service, by side: ``server`` (the service and what runs it), ``client`` (library,
CLI, jobs) and ``cluster`` (replicas behind Envoy); ``wire`` (tensors and enum names), ``security``
(TLS and tokens) and ``processes`` (dcgan-serve as a child) are shared."""
