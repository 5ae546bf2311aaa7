"""vLLM, the gateway in front of it (routes, router, the recording of each call) and redeploying policy versions."""
