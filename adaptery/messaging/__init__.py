"""The agents' overlay: a NATS server beside the control plane, agent credentials, and the protocol
by which agents lease and run jobs without ever touching the database or accepting a connection."""
