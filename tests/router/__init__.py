"""Unit tests of the fleet router (kubeinfer_router)."""
