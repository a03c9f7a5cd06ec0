"""Protocol assignment: free-text clinical note -> one label from a closed set."""

from __future__ import annotations

TEXT_COLUMNS = ["text", "input", "note", "notes", "clinical_note", "clinical_notes",
                "clinical_text", "report", "indication", "sentence"]
LABEL_COLUMNS = ["label", "labels", "radiology_labels", "radiology_label", "protocol",
                 "ground_truth", "target", "class", "category"]
