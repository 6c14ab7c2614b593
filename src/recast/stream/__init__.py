"""What a streamed conversion (`recast.streamed`) keeps below the recipe: the recipe's
`stream` section (`settings`) and the work directory a killed run resumes from (`work`)."""
