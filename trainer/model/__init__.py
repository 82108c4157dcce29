"""What a model version is: bundle, preprocessing layers, runtime, cascade rule, explain."""
