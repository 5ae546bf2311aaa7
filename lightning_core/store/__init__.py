"""The Delta tables: the spans, the pipeline's outputs and the state tables, and the snapshots readers query."""
