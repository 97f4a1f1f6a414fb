"""Sites: hospitals enrolled in the consortium, with their public keys."""
