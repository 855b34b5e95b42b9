"""kubeinfer_serving.api"""
