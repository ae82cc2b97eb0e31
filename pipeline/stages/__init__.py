"""What runs inside Ray, one module per stage: plan -> read -> decode -> dcnn -> crf -> encode -> write."""
