"""Small helpers shared by the engine, the data code and the tools."""
