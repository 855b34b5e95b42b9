"""kubeinfer_serving.registry"""
