"""The supervisor's NATS side, one job per module:

    link.py      the connection: connect, start the bundled broker, take it over, buckets
    relay.py     desired config in: the bucket's changes, copied into the mailboxes
    pump.py      the mailboxes out: outcomes (each exactly once), schema, status, heartbeat
    outbox.py    what goes to the broker, kept while it is away and sent when it is back
    registry.py  the job's record and its devices, and device failures from health checkers
    ledger.py    the change ledger: every answered change, in the broker and on disk
    history.py   each replica's metric history, bounded; served on request, kept on disk
    plane.py     ControlPlane: the parts together, as the supervisor drives them

Data flows one way: broker -> relay -> mailbox -> pump -> outbox -> broker. Training never
waits on any of it: a worker only reads and writes its mailbox.
"""
