"""HTTP layer: routes, schemas, error mapping. Knows nothing of tensors."""
