"""Fetch offers from AWS (aioboto3) and GCP (google-cloud-compute, Cloud Billing) into a
new snapshot, validate it against the active one and write it atomically (``run``)."""
