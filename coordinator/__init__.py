"""The coordinator: rounds, quorum and deadlines, semantic consensus, persisted state."""
