"""The server side: the service API and what runs it (plans, batcher, runtime, model store), the
dcgan.v1 front end (servicer, codec) and the process (``app``: ``python -m serving.server``)."""
