"""FSAF model: meta-architecture, head, backbone top block, assignment, losses, inference."""
