"""fedmoe's Flower ClientApp (``clients.app:app``) and the client's durable state."""
