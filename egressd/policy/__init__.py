"""Job policies: model, JWS signing and verification, matching."""
