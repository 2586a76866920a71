"""The Starlette app: Vapi webhooks, the kill switch, provisioning, wallet and admin APIs."""
