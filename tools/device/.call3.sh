ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=330 ATOM_TEST_WORKERS=8 timeout 340 bash tools/device/run_gpu_tests.sh core,server -k "prefill or router or fused_experts or mla_decode_large or grouped_topk or tiny_model or deepseek or token_budget or profiled_kv or glm" 2>&1 | tail -12
export PYTHONPATH=packages/atom-core/src:packages/atom-server/src:/tmp/site
timeout 150 python3 tools/device/decode_profile.py --presets deepseek-v2-lite --batch-sizes 1,32,128 --no-profile --label new 2>&1 | grep "^\[new\]"
