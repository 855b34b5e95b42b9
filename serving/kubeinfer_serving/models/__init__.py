"""kubeinfer_serving.models"""
