// tb_fxp_linear: a linear layer (N inputs of K words -> N x C outputs) on fxp_dot, fed from golden vectors.
// The memories are read with $readmemh from the .mem files of python -m fxpsweep.export
// (one two's-complement word per line); SHIFT_FILE holds, per output channel, the 12-bit word
// {bias_shift[5:0], out_shift[5:0]} that the test computes from manifest.json.
// Outputs come one per output_valid pulse, row-major (index n * C + c), for the test to compare.
module tb_fxp_linear #(
    parameter N = 1, K = 64, C = 10,
    parameter W_A = 8, W_W = 8, W_B = 32, W_ACC = 48, W_OUT = 8, ROUNDING = 0,
    parameter A_FILE = "input.mem", W_FILE = "weight.mem", B_FILE = "bias.mem", SHIFT_FILE = "shift.mem"
) (
    input  wire clk,
    input  wire start,
    output wire output_valid,
    output wire [31:0] output_index,
    output wire signed [W_OUT-1:0] y,
    output wire done
);
    reg [W_A-1:0] a_mem [0:N*K-1];
    reg [W_W-1:0] w_mem [0:C*K-1];
    reg [W_B-1:0] b_mem [0:C-1];
    reg [11:0] s_mem [0:C-1];
    initial begin
        $readmemh(A_FILE, a_mem);
        $readmemh(W_FILE, w_mem);
        $readmemh(B_FILE, b_mem);
        $readmemh(SHIFT_FILE, s_mem);
    end

    localparam IDLE = 0, CLEAR = 1, MAC = 2, PRESENT = 3, DONE = 4;
    reg [2:0] state;
    reg [31:0] n, c, k;
    wire [11:0] shifts = s_mem[c];
    fxp_dot #(.W_A(W_A), .W_W(W_W), .W_B(W_B), .W_ACC(W_ACC), .W_OUT(W_OUT), .ROUNDING(ROUNDING)) dot (
        .clk(clk), .clear(state == CLEAR), .valid(state == MAC),
        .a(a_mem[n * K + k]), .w(w_mem[c * K + k]), .bias(b_mem[c]),
        .bias_shift(shifts[11:6]), .out_shift(shifts[5:0]), .y(y)
    );
    assign output_valid = state == PRESENT;      // y is output n * C + c while it is high
    assign output_index = n * C + c;
    assign done = state == DONE;

    initial begin
        state = IDLE; n = 0; c = 0; k = 0;
    end

    // One output: a clear cycle, K cycles of products, one cycle with y on the port.
    always @(posedge clk) begin
        case (state)
            IDLE: if (start) begin state <= CLEAR; n <= 0; c <= 0; end
            CLEAR: begin state <= MAC; k <= 0; end
            MAC: if (k == K - 1) state <= PRESENT; else k <= k + 1;
            PRESENT: begin
                if (c == C - 1) begin
                    c <= 0;
                    if (n == N - 1) state <= DONE; else begin n <= n + 1; state <= CLEAR; end
                end else begin
                    c <= c + 1;
                    state <= CLEAR;
                end
            end
            default: ;
        endcase
    end
endmodule
