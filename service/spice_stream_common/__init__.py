"""What the service, the worker and the helper share: the stream-device protocol, frame parts,
the outbox, the Xauthority rule, names, log setup, exit codes. Imports none of them."""
