"""The end-to-end demo: from nothing to a request traced from its prompt to its payout, on the
local stack.

Steps (`steps/`), each cached where its inputs did not change:
1. the stack (`loraledger stack up` in a child process): the Kafka broker, reused when one
   already answers, the ledger server, the topics and the ClickHouse DDL;
2. the tiny base model (built once into the shared cache);
3. synthetic datanets, one per domain, with many contributors and planted facts: their rows are
   published as `DatanetContribution` events, folded into the store and snapshotted;
4. one LoRA adapter per datanet snapshot, announced on `adapters`;
5. the GPU worker and the Faust pipeline as subprocesses (`processes`);
6. requests across the adapters (planted-fact prompts and general ones), then a wait until every
   request has its result, attribution and reward entries on Kafka;
7. the pipeline stops, so the ledger holds everything it will write, the ledger is checked
   against the log, and one request is traced and verified.

`run.run_demo` runs them in order; `ui` draws the terminal output. Every step raises
`DemoError` with a one-line message when a piece is missing or broken.
"""
