"""What a trained model gives back: sampled text and word embeddings."""
