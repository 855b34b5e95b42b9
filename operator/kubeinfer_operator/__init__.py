"""kubeinfer operator: reconciles InferenceService objects into Deployment, Service and HPA."""

__version__ = "0.1.0"
