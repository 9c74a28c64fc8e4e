"""The caption stage: regions in, captions out (back ends live in captioners/)."""
