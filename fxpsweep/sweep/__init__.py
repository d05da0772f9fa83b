"""One job of a sweep, its folder and stored records, and the aggregation of results into tables."""
