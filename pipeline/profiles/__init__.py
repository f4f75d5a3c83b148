"""Profile logic: pure in-place merging of events, records and whole profiles."""
