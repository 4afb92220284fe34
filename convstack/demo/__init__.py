"""The halves of `make demo`: serve and predict (`serve`), then roll a version out (`rollout`)."""
