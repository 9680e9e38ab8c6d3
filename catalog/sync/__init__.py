"""Fetch offers from AWS and GCP into a new snapshot."""
