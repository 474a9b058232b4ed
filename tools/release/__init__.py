"""Release tools: bundle packaging, checkpoint conversion, bundle code sync, the model zoo format checks."""
