"""Siamese models (TAO's Siamese_3 and Siamese_1) and the contrastive loss."""
