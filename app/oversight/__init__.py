"""What the operator oversees: admin tokens with roles, the audit log and webhooks.

``models`` holds the tables; ``tokens`` the admin tokens; ``audit`` the one helper every admin
API and CLI write calls; ``webhooks`` the registrations, ``events`` the durable outbox of
events (one per transition) and ``delivery`` the signed POSTs the workers make.
"""
