"""OTLP in, rows out: the collector, the request decoders and the group-commit writer into the span tables."""
