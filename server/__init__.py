"""fedmoe's Flower ServerApp (``server.app:app``) and the FedMoE strategy."""
