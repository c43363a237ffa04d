"""Federated fine-tuning: sites keep their data, the coordinator sees only securely aggregated updates.

`secagg` is the secure aggregation protocol (pure, no Flower), `lora` the exact LoRA aggregation
(FFA-LoRA) and sparse head fine-tuning (SPF), `apps` the Flower ServerApp and ClientApp that carry
them over Flower's message API.
"""
