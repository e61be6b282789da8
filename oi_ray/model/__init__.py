"""Siamese models (TAO's Siamese_3 and Siamese_1, oi-ray's SiameseSpatial) and the contrastive loss."""
