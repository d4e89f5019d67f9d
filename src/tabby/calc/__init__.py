"""Pure calculation: datastore resources -> the desired state of one node. No I/O here."""
