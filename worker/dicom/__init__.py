"""The DICOM network: a C-STORE listener feeding the inbox, and results (SR, heatmap SC) going
back to the study through a durable outbox."""
