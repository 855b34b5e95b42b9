"""kubeinfer's fleet router: a model-, prefix- and load-aware HTTP proxy in front of an InferenceService's serving pods."""
