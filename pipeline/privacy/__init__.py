"""Erasure of a person (GDPR / CCPA): requests, their status, the suppression list and the verification."""
