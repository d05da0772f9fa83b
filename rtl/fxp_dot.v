// fxp_dot: one output of a fixed-point dot product (a conv or linear layer), bit for bit as
// fxpsweep's exact engine computes it (docs/semantics.md):
//   acc = sum_k a_k * w_k                          exact: W_ACC bits hold every partial sum
//   v   = acc + bias * 2**BIAS_SHIFT               the bias aligned to the accumulator's LSB
//   y   = saturate(round(v * 2**-OUT_SHIFT))       one rounding into the output register
// BIAS_SHIFT = F_acc - F_bias and OUT_SHIFT = F_acc - F_out (F_acc = F_input + F_weight of the
// output channel) come from the golden vectors' manifest, per output channel.
// ROUNDING: 0 nearest_even (ties to even), 1 floor (two's-complement truncation).
// A template: copy it for your own datapath and keep the golden-vector testbench.
module fxp_dot #(
    parameter W_A = 8,        // input word
    parameter W_W = 8,        // weight word
    parameter W_B = 32,       // bias word
    parameter W_ACC = 48,     // accumulator: wide enough for every partial sum and the shifted bias
    parameter W_OUT = 8,      // output word
    parameter ROUNDING = 0
) (
    input  wire clk,
    input  wire clear,                          // start a new output: acc <= 0
    input  wire valid,                          // a and w hold one product term this cycle
    input  wire signed [W_A-1:0] a,
    input  wire signed [W_W-1:0] w,
    input  wire signed [W_B-1:0] bias,
    input  wire [5:0] bias_shift,
    input  wire [5:0] out_shift,
    output reg  signed [W_OUT-1:0] y           // from the accumulator as it stands
);
    reg signed [W_ACC-1:0] acc;
    always @(posedge clk) begin
        if (clear)
            acc <= 0;
        else if (valid)
            acc <= acc + a * w;                 // all operands signed: sign-extended to W_ACC
    end

    wire signed [W_ACC-1:0] biased = bias;      // sign-extended first, then shifted
    wire signed [W_ACC-1:0] v = acc + (biased <<< bias_shift);
    wire signed [W_ACC-1:0] q = v >>> out_shift;                 // floor(v / 2**out_shift)
    wire [W_ACC-1:0] rest = v - (q <<< out_shift);               // 0 <= rest < 2**out_shift
    wire [W_ACC-1:0] half = (out_shift == 0) ? 0 : ({{(W_ACC-1){1'b0}}, 1'b1} << (out_shift - 1));
    wire round_up = (ROUNDING == 0) && (out_shift != 0) && ((rest > half) || ((rest == half) && q[0]));
    wire signed [W_ACC-1:0] r = q + round_up;
    localparam signed [W_ACC-1:0] MAX = (1 <<< (W_OUT - 1)) - 1;
    localparam signed [W_ACC-1:0] MIN = -(1 <<< (W_OUT - 1));

    always @* begin
        if (r > MAX)
            y = MAX[W_OUT-1:0];                 // saturate
        else if (r < MIN)
            y = MIN[W_OUT-1:0];
        else
            y = r[W_OUT-1:0];
    end
endmodule
