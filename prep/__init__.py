"""Data preparation scripts (one per dataset); see prep/README.md."""
