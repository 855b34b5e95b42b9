"""kubeinfer_serving.engine"""
