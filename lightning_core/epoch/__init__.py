"""One epoch's stages as plain functions, their bookkeeping in the state tables, and the services they run on."""
