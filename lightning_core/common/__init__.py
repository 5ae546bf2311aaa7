"""Process and file mechanics every part shares: durable writes, the servers Arclight starts and stops, stopping on Ctrl-C, the hardware, the base model folder."""
