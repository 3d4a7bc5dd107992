"""Model shapes the tests and benchmarks share (no torch here: training subprocesses import these too)."""

TINY = dict(vocab_size=101, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            dropout=0.0, scale_embedding=True)
FULL_90M = dict(vocab_size=54944, d_model=512, encoder_layers=8, decoder_layers=8, encoder_attention_heads=16,
                decoder_attention_heads=16, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                max_position_embeddings=512, dropout=0.0, scale_embedding=True)
