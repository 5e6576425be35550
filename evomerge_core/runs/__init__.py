"""The run store and everything that keeps a search alive: storage, leases, retries, resume, bookkeeping, reports."""
