"""The adversarial suite (issue #12): seeded, bounded, property-based attacks on a running
`convstack serve`, one server per module, counting attempts, crashes, hangs and wrong codes."""
